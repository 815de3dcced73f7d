"""Webhooks: the event as a JSON POST, signed with HMAC-SHA256 over the body.

Headers: ``X-Kmodgate-Event`` (kind), ``X-Kmodgate-Delivery`` (stable per
delivery: a receiver deduplicates on it), ``X-Kmodgate-Signature``
(``sha256=<hex>``, as GitHub's webhooks do, when a secret is configured).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import Sequence

from kmodgate import __version__
from kmodgate.config import WebhookConfig
from kmodgate.notify.events import Message
from kmodgate.notify.outbox import DeliveryError

SIGNATURE_HEADER = "X-Kmodgate-Signature"
# Worth retrying: the receiver is overloaded or briefly broken.
_TRANSIENT_STATUS = frozenset({408, 425, 429})


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """For receivers: is *header* the signature of *body* under *secret*?"""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


class WebhookSender:
    def __init__(self, hooks: Sequence[WebhookConfig]) -> None:
        self.hooks: dict[str, WebhookConfig] = {}
        for hook in hooks:
            self.hooks.setdefault(hook.url, hook)

    def send(self, message: Message) -> None:
        hook = self.hooks.get(message.recipient)
        if hook is None:
            # The webhook left the configuration after the event was queued.
            raise DeliveryError(f"no webhook {message.recipient} configured", permanent=True)
        body = json.dumps(message.document(), sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"kmodgate/{__version__}",
            "X-Kmodgate-Event": message.kind,
            "X-Kmodgate-Delivery": str(message.delivery_id),
        }
        if hook.secret:
            headers[SIGNATURE_HEADER] = sign(hook.secret, body)
        request = urllib.request.Request(hook.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=hook.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            permanent = 400 <= exc.code < 500 and exc.code not in _TRANSIENT_STATUS
            raise DeliveryError(f"HTTP {exc.code} from {hook.url}", permanent=permanent) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DeliveryError(f"cannot reach {hook.url}: {reason}") from None
