"""``groundup serve``: models behind an OpenAI-compatible API (and the rating UI), on Ray Serve.

One Serve application, ``groundup``: the FastAPI ingress (:mod:`serving.api`) plus one
:class:`~serving.model_server.ModelServer` deployment per model, each with its own replicas or
autoscaling and CPU/GPU resources. The UI is a second application, ``groundup-ui``, at ``/ui`` with
exactly one replica (Gradio sessions are not sticky across replicas); it reaches the API over HTTP
like any other client. ``serving/serve_config.yaml`` deploys the same two applications with
``serve deploy`` through :func:`app_builder` and :func:`ui_app_builder`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.cli import Flag
from pipelines.config import ConfigError, StageConfig, StrictModel, build_config
from pipelines.rundir import is_local, local_copy

API_APP_NAME = "groundup"
UI_APP_NAME = "groundup-ui"
UI_ROUTE_PREFIX = "/ui"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


# Ray Serve 2.60's throughput mode (Serve's performance guide): user code and the router on each
# replica's main event loop (no hop to a second thread per message), gRPC between the ingress and the
# model replicas. Direct ingress, which that mode also turns on, is kept off: it would serve HTTP from
# the ingress replicas on ports of their own instead of the proxy's --port. Access logs stay unbuffered
# and on stderr, so `groundup serve` still shows each request and error as it happens (measured: no
# throughput difference on 2 cores).
SERVE_THROUGHPUT_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


def apply_serve_throughput_env() -> None:
    """Export :data:`SERVE_THROUGHPUT_ENV` (values already set win) before Ray starts, so that a local
    cluster started by this process passes it to Serve's controller and proxy too."""
    for key, value in SERVE_THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)


@functools.lru_cache(maxsize=64)
def _weights_digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the weight files' bytes, cached by (path, size, mtime) so configs rebuild cheaply."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def weights_version(directory: Path) -> str:
    """A short hash of a checkpoint's weights: the model version shown in /v1/models and kept with votes,
    so that ratings of different weights served under one name stay apart."""
    files = sorted(directory.glob("*.safetensors"))
    return _weights_digest(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))[:12]


class ModelEntry(StrictModel):
    """A served model: its public name and a checkpoint directory (ours or a Hugging Face export)."""

    name: str
    path: str
    format: Literal["groundup", "hf"] = "groundup"
    max_context: int = 0
    version: str = ""  # set from the weights (see weights_version)

    @staticmethod
    def parse(spec: str) -> dict[str, str]:
        """``NAME=PATH`` -> the entry's fields (checked when the entry is validated)."""
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"model {spec!r} is not of the form NAME=PATH")
        return {"name": name, "path": path}

    @model_validator(mode="after")
    def _check_directory(self) -> ModelEntry:
        from model.config import ModelConfig

        if not _NAME.match(self.name):
            raise ValueError(f"model {self.name!r}: names may use letters, digits and . _ : -")
        where = f"model {self.name}={self.path}"
        remote = not is_local(self.path)
        try:  # an object-store model is checked on a copy here; each replica fetches its own (local_copy)
            directory = local_copy(self.path) if remote else Path(self.path).expanduser()
        except ConfigError as err:
            raise ValueError(f"{where}: {err}") from None
        if not directory.is_dir():
            raise ValueError(f"{where}: no such directory")
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{where}: no config.json (not a checkpoint, or an incomplete one)")
        try:
            data = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{where}: config.json is not valid JSON") from None
        if not (directory / "tokenizer.model").is_file():
            raise ValueError(f"{where}: no tokenizer.model beside the weights")
        if "architectures" in data:  # a Hugging Face export
            if data.get("model_type") != "llama":
                raise ValueError(f"{where}: Hugging Face model_type {data.get('model_type')!r}; only llama")
            if not list(directory.glob("*.safetensors")):
                raise ValueError(f"{where}: no .safetensors weights")
            object.__setattr__(self, "format", "hf")
            object.__setattr__(self, "max_context", int(data.get("max_position_embeddings", 2048)))
        else:
            if not (directory / "model.safetensors").is_file():
                raise ValueError(f"{where}: no model.safetensors")
            try:
                config = ModelConfig(**data)
            except Exception as err:
                raise ValueError(f"{where}: config.json is not a model config ({str(err).splitlines()[0]})") from None
            object.__setattr__(self, "format", "groundup")
            object.__setattr__(self, "max_context", config.max_seq_len)
        object.__setattr__(self, "path", self.path if remote else str(directory.resolve()))
        object.__setattr__(self, "version", weights_version(directory))
        return self


class Autoscaling(StrictModel):
    """Serve's autoscaling_config for each model deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="concurrent requests per replica to aim for")

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be at least min_replicas")
        return self


class Config(StageConfig):
    models: list[ModelEntry] = Field(default_factory=list, description="NAME=PATH checkpoint directories")
    host: str = Field("127.0.0.1", description="HTTP host of Serve's proxy (0.0.0.0 to listen on every interface)")
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = "/"
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    replicas: int = Field(1, ge=1, description="replicas per model when autoscaling is off")
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(0.5, ge=0, description="CPUs per model replica (reserved in Ray's scheduler; the "
                            "default lets two models, the API and the rating app fit on 2 CPUs)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions share a GPU)")
    ingress_num_cpus: float = Field(0.1, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(16, ge=1, description="KV-cache rows: sequences decoded together per replica")
    max_ongoing_requests: int = Field(64, ge=1, description="requests queued per model replica")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request leaves it out")
    max_choices_per_request: int = Field(64, ge=1, description="answers one request may ask for (prompts x n, "
                                         "or x best_of); more is a 400 naming this limit")
    max_tokens_per_request: int = Field(65536, ge=1, description="prompt and answer tokens one request may "
                                        "occupy (summed over its choices); more is a 400 naming this limit")
    health_check_period_s: float = Field(2.0, gt=0, description="how often Serve asks each model replica "
                                         "whether its engine runs (a dead one is replaced)")
    stream_interval: int = Field(
        8, ge=1, description="tokens of a choice sent per streamed chunk (the first token always goes alone); "
        "1 sends every token as it comes, larger values cut per-token overhead for higher throughput")
    device: str | None = Field(None, description="cuda, cpu, ...; default: CUDA when present")
    colocate: bool = Field(
        True, description="with one model: serve the API from the model's own replicas (one Ray hop fewer per "
        "request, measured +9% tokens/s at 16 concurrent streams; API and model scale together). Several "
        "models always get a separate ingress")
    engine_process: bool = Field(
        True, description="run each replica's batching engine in a child process, so its Python never waits "
        "for the GIL held by Serve's event loop (measured: the replica's tokens/s rose from ~80% of the "
        "in-process engine); false runs it on a thread of the replica")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="weights and KV cache: auto = bfloat16 on GPUs with bf16, float32 on CPU; "
        "bfloat16 also pays on CPUs with AVX512-BF16/AMX")
    api_keys: list[str] = Field(default_factory=list, description="Bearer keys; empty: no authentication")
    rate_limit_per_minute: int | None = Field(None, ge=1, description="requests per minute per API key, "
                                              "counted by each ingress replica on its own")
    throughput_mode: bool = Field(True, description="Ray Serve's throughput settings for the API's replicas "
                                  "(SERVE_THROUGHPUT_ENV); on a running cluster set them there for the proxy too")
    ui: bool = Field(True, description="serve the rating UI at /ui (needs ui/app.py)")
    ui_api_url: str | None = Field(None, description="API base the UI calls; default: this server's /v1")
    database_url: str | None = Field(None, description="the UI's preference store; default: "
                                     "<run>/ui/preferences.db, the run being the first model's run directory")
    prompts: str | None = Field(None, description="a prompt set the rating app draws rounds from (.txt: one "
                                "prompt per line; .jsonl: prompt/messages/question per record)")
    replace: bool = Field(False, description="replace groundup's deployment already serving on --port")
    check_resources: bool = Field(True, description="check the cluster has the CPUs/GPUs the deployment "
                                  "reserves before deploying (false on autoscaling clusters)")
    block: bool = Field(True, description="wait for Ctrl-C after deploying")

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return [ModelEntry.parse(v) if isinstance(v, str) else v for v in value or []]

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        return [k for k in value.split(",") if k] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_models(self) -> Config:
        if not self.models:
            raise ValueError("give at least one model: --model NAME=PATH")
        names = [m.name for m in self.models]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ValueError(f"model name {duplicate!r} is given twice")
        return self

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from ui.prompts import load_prompt_set

        path = Path(value).expanduser().resolve()
        load_prompt_set(path)  # raises ValueError naming the file and line
        return str(path)

    @property
    def api_base(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    def votes_directory(self) -> str:
        """Where votes go by default: ``<run>/ui`` — ``run`` when given, else the run directory of the first
        served model (the folder above its stage's, which holds the stage's manifest.json)."""
        if "run" in self.model_fields_set:
            return f"{self.run.rstrip('/')}/ui"
        model = self.models[0].path
        if "://" in model:
            return f"{model.rstrip('/').rsplit('/', 2)[0]}/ui"
        stage = Path(model).parent
        return str((stage.parent if (stage / "manifest.json").is_file() else stage) / "ui")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        directory = self.votes_directory()
        if "://" in directory:
            raise ConfigError(f"database_url is required: the votes' default place {directory} is not local "
                              "(SQLite needs a local file)")
        return f"sqlite:///{Path(directory).resolve() / 'preferences.db'}"


CLI_FLAGS: tuple[Flag, ...] = (
    Flag(("--model",), "models", "NAME=PATH of a checkpoint directory (repeat for several models)",
         {"action": "append", "metavar": "NAME=PATH"}),
    Flag(("--port",), "port", "HTTP port", {"type": int}),
    Flag(("--host",), "host", "HTTP host (0.0.0.0 for every interface)"),
    Flag(("--replicas",), "replicas", "replicas per model", {"type": int}),
    Flag(("--num-gpus",), "num_gpus", "GPUs per model replica", {"type": float}),
    Flag(("--stream-interval",), "stream_interval", "tokens per streamed chunk (1: every token)", {"type": int}),
    Flag(("--dtype",), "dtype", "weights and KV cache: auto, float32 or bfloat16"),
    Flag(("--api-key",), "api_keys", "require this Bearer key (repeat for several)", {"action": "append"}),
    Flag(("--ui",), "ui", "serve the rating UI at /ui", {"action": argparse.BooleanOptionalAction}),
    Flag(("--database-url",), "database_url", "the UI's preference store (SQLAlchemy URL)"),
    Flag(("--prompts",), "prompts", "a prompt set for the rating app's rounds (.txt or .jsonl)"),
    Flag(("--replace",), "replace", "replace groundup's deployment already serving on --port",
         {"action": "store_true"}),
)


# ---- Serve applications -------------------------------------------------------------------------------
def server_settings(config: Config):
    from serving.model_server import ServerSettings

    return ServerSettings(max_batch_size=config.max_batch_size, default_max_tokens=config.default_max_tokens,
                          device=config.device, stream_interval=config.stream_interval, dtype=config.dtype,
                          engine_process=config.engine_process,
                          max_choices_per_request=config.max_choices_per_request,
                          max_tokens_per_request=config.max_tokens_per_request)


def build_application(config: Config):
    """The API application: the OpenAI ingress bound to one ModelServer deployment per model."""
    from ray import serve

    from serving.api import ApiSettings, OpenAIIngress
    from serving.model_server import ModelServer

    # The same settings on both sides of each call (the ingress's handles and the model replicas).
    runtime_env = {"runtime_env": {"env_vars": dict(SERVE_THROUGHPUT_ENV)}} if config.throughput_mode else {}
    scaling: dict[str, Any] = {"num_replicas": config.replicas}
    if config.autoscaling is not None:
        scaling = {"num_replicas": "auto", "autoscaling_config": config.autoscaling.model_dump()}
    settings = ApiSettings(max_context={m.name: m.max_context for m in config.models},
                           versions={m.name: m.version for m in config.models},
                           api_keys=tuple(config.api_keys), rate_limit_per_minute=config.rate_limit_per_minute)
    server = server_settings(config)
    model_options = dict(max_ongoing_requests=config.max_ongoing_requests,
                         health_check_period_s=config.health_check_period_s,
                         ray_actor_options={"num_cpus": config.num_cpus, "num_gpus": config.num_gpus, **runtime_env},
                         **scaling)
    if config.colocate and len(config.models) == 1:
        from serving.api import ColocatedIngress

        entry = config.models[0]
        deployment = serve.deployment(serve.ingress()(ColocatedIngress)).options(name=f"model-{entry.name}",
                                                                                 **model_options)
        return deployment.bind(entry.name, entry.path, server, settings)
    handles = {}
    for entry in config.models:
        deployment = serve.deployment(ModelServer).options(name=f"model-{entry.name}", **model_options)
        handles[entry.name] = deployment.bind(entry.name, entry.path, server)
    ingress = serve.deployment(serve.ingress()(OpenAIIngress)).options(
        name="openai-api", num_replicas=config.ingress_replicas, max_ongoing_requests=1000,
        ray_actor_options={"num_cpus": config.ingress_num_cpus, **runtime_env})
    return ingress.bind(handles, settings)


def ui_available() -> bool:
    return importlib.util.find_spec("ui.app") is not None


class UIServer:
    """The rating UI as one replica: ``ui.app.build_app`` runs inside the replica (a built Gradio app
    does not pickle), and the API is reached over HTTP like any client."""

    def __init__(self, api_url: str, database_url: str, api_key: str | None = None, prompts: str | None = None):
        self.api_url, self.database_url, self.api_key, self.prompts = api_url, database_url, api_key, prompts

    def __serve_build_asgi_app__(self):
        from ui.app import build_app

        app = build_app(api_url=self.api_url, database_url=self.database_url, api_key=self.api_key,
                        prompts=self.prompts)

        async def at_site_root(scope, receive, send):
            # Serve sets root_path to the route prefix ("/ui"); build_app already mounts Gradio at /ui,
            # so present the request as if served at the root to keep the UI at /ui, not /ui/ui.
            if scope["type"] in ("http", "websocket"):
                scope = {**scope, "root_path": ""}
            await app(scope, receive, send)

        return at_site_root


def build_ui_application(config: Config):
    from ray import serve

    api_url = config.ui_api_url or f"{config.api_base}/v1"
    deployment = serve.deployment(serve.ingress()(UIServer)).options(
        name="ui", num_replicas=1, ray_actor_options={"num_cpus": config.ingress_num_cpus})
    # With API keys on, the UI is one more client of the API and uses the first key.
    api_key = config.api_keys[0] if config.api_keys else None
    return deployment.bind(api_url, config.resolved_database_url(), api_key, config.prompts)


def _config_from_args(args: dict[str, Any]) -> Config:
    return build_config(Config, values=dict(args or {}))


def app_builder(args: dict[str, Any]):
    """``import_path: serving.app:app_builder`` in a Serve config file; ``args`` are Config fields."""
    return build_application(_config_from_args(args))


def ui_app_builder(args: dict[str, Any]):
    return build_ui_application(_config_from_args(args))


# ---- the stage ---------------------------------------------------------------------------------------------
def _metrics_url() -> str | None:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def _replicas_per_model(config: Config) -> int:
    return config.autoscaling.min_replicas if config.autoscaling is not None else config.replicas


def required_resources(config: Config) -> dict[str, float]:
    """CPUs and GPUs the deployment reserves in Ray's scheduler (Serve's controller and proxy take none)."""
    models = len(config.models) * _replicas_per_model(config)
    cpus = models * config.num_cpus
    if not (config.colocate and len(config.models) == 1):
        cpus += config.ingress_replicas * config.ingress_num_cpus
    if config.ui:
        cpus += config.ingress_num_cpus
    return {"CPU": round(cpus, 3), "GPU": round(models * config.num_gpus, 3)}


def check_resources(config: Config) -> None:
    """Fail in one line, before deploying, when the cluster lacks what the deployment reserves."""
    import ray

    if not config.check_resources:
        return
    need, free = required_resources(config), ray.available_resources()
    for kind, setting in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        if need[kind] <= free.get(kind, 0.0) + 1e-9:
            continue
        parts = [f"{len(config.models)} model(s) x {_replicas_per_model(config)} replica(s) x "
                 f"{setting}={getattr(config, setting):g}"]
        if kind == "CPU" and not (config.colocate and len(config.models) == 1):
            parts.append(f"API {config.ingress_replicas} x {config.ingress_num_cpus:g}")
        if kind == "CPU" and config.ui:
            parts.append(f"rating app {config.ingress_num_cpus:g}")
        raise ConfigError(f"not enough {kind}s: the deployment needs {need[kind]:g} ({' + '.join(parts)}) and the "
                          f"cluster has {free.get(kind, 0.0):g} free: lower {setting} or replicas (on an "
                          "autoscaling cluster: check_resources=false)")


def port_owner(host: str, port: int) -> dict[str, str] | None:
    """Who listens on host:port: None for nobody, Ray Serve's applications ({route: name}, maybe empty) when
    its proxy answers ``/-/routes``, else ``{"": "another program"}``."""
    import httpx

    address = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        with socket.create_connection((address, port), timeout=2):
            pass
    except OSError:
        return None
    try:
        routes = httpx.get(f"http://{address}:{port}/-/routes", timeout=5).json()
        if isinstance(routes, dict) and all(isinstance(v, str) for v in routes.values()):
            return {str(route): name for route, name in routes.items()}
    except (httpx.HTTPError, ValueError):
        pass
    return {"": "another program"}


def _running_serve_port() -> int | None:
    """The HTTP port of Ray Serve on the connected cluster, or None when Serve is not running there."""
    try:  # Serve has no public call for its running HTTP options; its client keeps them
        from ray.serve.context import _get_global_client

        client = _get_global_client(raise_if_no_controller_running=False)
        return None if client is None else int(client.http_config.port)
    except Exception:
        return None


def check_port(config: Config) -> None:
    """Refuse, before deploying, a port another program or another deployment is using (one line each);
    with ``replace``, groundup's applications already served there are deleted first."""
    from ray import serve

    from pipelines.ray_env import ensure_ray

    owner = port_owner(config.host, config.port)
    if owner and "" in owner and owner[""] == "another program":
        raise ConfigError(f"port {config.port} is in use by another program: choose another --port")
    apps = sorted(set((owner or {}).values()))
    if apps and not config.replace:
        listing = ", ".join(f"{name} (at {route})" for route, name in sorted(owner.items()))
        raise ConfigError(f"port {config.port} already serves the Ray Serve application(s) {listing}: stop that "
                          "`groundup serve`, choose another --port, or pass --replace to replace it")
    ensure_ray()
    running = _running_serve_port()
    if running is not None and running != config.port:
        raise ConfigError(f"Ray Serve already runs on this cluster at port {running} (one port per cluster): use "
                          f"--port {running}, adding --replace to replace what it serves")
    if owner is not None and running is None:
        raise ConfigError(f"port {config.port} is served by Ray Serve of another Ray cluster than this command "
                          "joins (RAY_ADDRESS): stop it there or choose another --port")
    for name in apps:
        if name in (API_APP_NAME, UI_APP_NAME):  # the deployment `groundup serve` makes; others stay
            serve.delete(name)


def deploy(config: Config) -> dict[str, str]:
    """Start Serve on the running Ray cluster and deploy the API (and the UI); returns the URLs.

    Checked first, each failing in one line: the port (free, or ours to ``replace``) and the resources the
    deployment reserves against what the cluster has free."""
    from ray import serve

    if config.throughput_mode:
        apply_serve_throughput_env()
    check_port(config)  # before joining Ray: a used port is refused at once
    check_resources(config)
    serve.start(proxy_location=config.proxy_location, http_options={"host": config.host, "port": config.port})
    serve.run(build_application(config), name=API_APP_NAME, route_prefix=config.route_prefix, blocking=False)
    urls = {"api": f"{config.api_base}/v1", "health": f"{config.api_base}/health"}
    if config.ui:
        if ui_available():
            serve.run(build_ui_application(config), name=UI_APP_NAME, route_prefix=UI_ROUTE_PREFIX, blocking=False)
            host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
            urls["ui"] = f"http://{host}:{config.port}{UI_ROUTE_PREFIX}/"
            urls["votes"] = config.resolved_database_url()
        else:
            urls["ui"] = "not served: ui/app.py is not installed (use --no-ui to silence this)"
    metrics = _metrics_url()
    if metrics:
        urls["metrics"] = metrics
    return urls


def run(config: Config) -> dict[str, Any]:
    from ray import serve

    urls = deploy(config)
    models = ", ".join(f"{m.name} ({m.format}, context {m.max_context})" for m in config.models)
    print(f"serving {models}")
    for label, url in urls.items():
        print(f"  {label:8s} {url}")
    if config.block:
        print("press Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            for name in (UI_APP_NAME, API_APP_NAME):
                try:
                    serve.delete(name)
                except Exception:
                    pass
            raise
    return {"stage": "serve", "urls": urls, "models": [m.model_dump() for m in config.models]}


if __name__ == "__main__":
    from pipelines.cli import stage_main

    stage_main("serve")
