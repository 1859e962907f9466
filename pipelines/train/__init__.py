"""The shared training core: Ray Train workers each driving a DeepSpeed engine.

``config`` (typed settings) -> ``deepspeed_config`` (the DeepSpeed dict) -> ``trainer`` (a Ray Train
``TorchTrainer``) runs ``loop.train_worker`` on every worker, which asks a ``Task`` for batches and a
loss and uses ``schedule``, ``data``, ``checkpoint`` and ``metrics``. Pretraining, SFT and reward
modelling differ only in their Task.
"""
