"""PII redaction: e-mail addresses, phone numbers, IP addresses and card-like numbers.

Each match is replaced by a placeholder token and counted. Patterns are deliberately conservative
(phone numbers need a recognisable layout, card numbers must pass the Luhn check, IPv4 octets must
be <= 255) so version strings, dates and plain numbers in prose survive.
"""
from __future__ import annotations

import ipaddress
import re

from pydantic import Field

from pipelines.config import StrictModel

PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>"}

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b")
# 13-19 digits, optionally grouped by any run of spaces (also no-break spaces) or dashes between
# digits: 4-4-4-4, 4-6-5, "4111  1111  1111  1111", "4111 - 1111 - 1111 - 1111", ...
_CARD_GAP = "[ \u00a0\u2007\u202f-]*"
CARD = re.compile(r"(?<![\d-])\d(?:%s\d){12,18}(?![\d-])" % _CARD_GAP)
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
# Any run of hex digits and colons with two colons; ipaddress decides, and at least three groups
# are required so Python slices such as "a[::2]" are not taken for "::2".
IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
# +CC and/or (area) then groups: "+1 (555) 123-4567", "555-123-4567", "+44 20 7946 0958"; +CC then
# three to six groups of one to four digits: "+33 1 42 68 53 00", "+49 30 1234 5678"; the French
# national layout of five pairs: "01 42 68 53 00". 8 to 15 digits in all (E.164's longest is 15).
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .])"
    r"(?:(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
    r"|\+\d{1,3}(?:[ .-]\d{1,4}){3,6}"
    r"|0\d(?:[ .-]\d\d){4})"
    r"(?![\w-]|[ .]\d)"
)
PHONE_DIGITS = (8, 15)

# Cheap necessary conditions: when one finds nothing, the full pattern cannot match (or its match
# cannot be accepted) and its pass over the text is skipped. Those that start with a literal
# character let the regex engine jump between its occurrences instead of trying every position.
# An e-mail holds "@", a label, a dot and two letters after it.
_MAY_BE_EMAIL = re.compile(r"@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2}")
_MAY_BE_CARD = re.compile(r"\d(?:%s\d){12}" % _CARD_GAP)
# An IPv4 address holds ".d.d." (its second and third octets between dots), then a digit.
_MAY_BE_IPV4 = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d")
# An accepted IPv6 address has three non-empty groups: its first is followed by ":" and then by a
# group and ":", or by ":" (the "::"), and then by a hex digit.
_MAY_BE_IPV6 = re.compile(r":(?<=[0-9A-Fa-f]:)(?:[0-9A-Fa-f]{1,4}:|:)[0-9A-Fa-f]")
_MAY_BE_PHONE = re.compile(r"\d{3,4}[ .-]\d{3,4}|\d[ .-]\d\d[ .-]\d\d|\+\d")


class PIIConfig(StrictModel):
    enabled: bool = True
    email: bool = Field(True, description="replace e-mail addresses with <EMAIL>")
    phone: bool = Field(True, description="replace phone numbers with <PHONE>")
    ip: bool = Field(True, description="replace IPv4/IPv6 addresses with <IP_ADDRESS>")
    card: bool = Field(True, description="replace Luhn-valid 13-19 digit numbers with <CARD_NUMBER>")
    keep_raw_in_rejects: bool = Field(
        False, description="write rejected and quarantined documents to rejects/ unmasked (on purpose only: "
                           "by default PII is masked in everything the stage writes)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


YEARS = (1500, 2099)


def _is_phone(candidate: str) -> bool:
    """8 to 15 digits, and not a run of years ("1990 1991 1992", "2019-2020-2021"): groups of four
    digits that all read as years are a list of dates in prose, far likelier than a phone number."""
    if not PHONE_DIGITS[0] <= sum(c.isdigit() for c in candidate) <= PHONE_DIGITS[1]:
        return False
    groups = re.findall(r"\d+", candidate)
    return not all(len(g) == 4 and YEARS[0] <= int(g) <= YEARS[1] for g in groups)


def _is_ip(candidate: str) -> bool:
    if ":" in candidate and sum(1 for group in candidate.split(":") if group) < 3:
        return False
    try:
        ipaddress.ip_address(candidate)
        return True
    except ValueError:
        return False


def redact(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """(text with PII replaced by placeholders, count per kind)."""
    counts = {kind: 0 for kind in PLACEHOLDERS}
    if not cfg.enabled:
        return text, counts

    def replace(kind: str, accept=None):
        def substitute(match: re.Match) -> str:
            if accept is not None and not accept(match.group(0)):
                return match.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        return substitute

    # E-mail first (its digits must not look like phones); cards before phones (longer digit runs).
    if cfg.email and "@" in text and _MAY_BE_EMAIL.search(text):
        text = EMAIL.sub(replace("email"), text)
    if cfg.card and _MAY_BE_CARD.search(text):
        text = CARD.sub(replace("card", lambda s: luhn_valid(re.sub(r"\D", "", s))), text)
    if cfg.ip:
        if _MAY_BE_IPV4.search(text):
            text = IPV4.sub(replace("ip", _is_ip), text)
        if _MAY_BE_IPV6.search(text):
            text = IPV6.sub(replace("ip", _is_ip), text)
    if cfg.phone and _MAY_BE_PHONE.search(text):
        text = PHONE.sub(replace("phone", _is_phone), text)
    return text, counts
