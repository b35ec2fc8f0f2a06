"""Email and SMS addresses as OneSignal accepts them: emails checked for syntax, phones in E.164."""

from __future__ import annotations

from typing import Any

import email_validator
import phonenumbers


class InvalidAddress(ValueError):
    """An address OneSignal would reject; the message says why."""


def normalize_email(value: Any) -> str:
    text = str(value).strip()
    try:
        result = email_validator.validate_email(text, check_deliverability=False)
    except email_validator.EmailNotValidError as exc:
        raise InvalidAddress(f"{text[:60]!r} is not a valid email address ({exc})") from None
    return result.normalized


def normalize_phone(value: Any, default_region: str) -> str:
    text = str(value).strip()
    try:
        number = phonenumbers.parse(text, default_region.upper())
    except phonenumbers.NumberParseException as exc:
        raise InvalidAddress(f"{text[:40]!r} is not a phone number ({exc})") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidAddress(
            f"{text[:40]!r} is not a valid phone number (default region {default_region.upper()}); "
            f"store it in E.164 form such as +12125550199"
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize(channel: str, value: Any, default_region: str = "US") -> str:
    if channel == "email":
        return normalize_email(value)
    if channel == "sms":
        return normalize_phone(value, default_region)
    raise InvalidAddress(f"unknown subscription channel {channel!r}")
