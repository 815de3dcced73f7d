"""Email through SMTP (host, port, STARTTLS, auth from kmodgate.toml)."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, parseaddr

from kmodgate.config import EmailConfig
from kmodgate.notify.events import Message, body, subject
from kmodgate.notify.outbox import DeliveryError


class EmailSender:
    def __init__(self, config: EmailConfig, *, timeout: float = 30.0,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.timeout = timeout
        self.tls_context = tls_context

    def build(self, message: Message) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self.config.sender
        mail["To"] = message.recipient
        mail["Subject"] = subject(message)
        mail["Date"] = formatdate(message.created_at.timestamp(), usegmt=True)
        # Stable per delivery: a resend after a crash is the same message, which
        # mail systems and readers deduplicate.
        domain = parseaddr(self.config.sender)[1].rpartition("@")[2] or "kmodgate.invalid"
        mail["Message-ID"] = f"<kmodgate.{message.event_id}.{message.delivery_id}@{domain}>"
        mail["X-Kmodgate-Event"] = message.kind
        mail["X-Kmodgate-Key"] = message.key
        if message.module:
            mail["X-Kmodgate-Module"] = message.module
        mail.set_content(body(message))
        return mail

    def send(self, message: Message) -> None:
        mail = self.build(message)
        cfg = self.config
        try:
            with smtplib.SMTP(cfg.host, cfg.port, timeout=self.timeout) as smtp:
                if cfg.starttls:
                    smtp.starttls(context=self.tls_context or ssl.create_default_context())
                if cfg.username:
                    smtp.login(cfg.username, cfg.password or "")
                smtp.send_message(mail, from_addr=parseaddr(cfg.sender)[1],
                                  to_addrs=[message.recipient])
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            # 5xx: the address does not exist, retrying cannot help; 4xx: try later.
            raise DeliveryError(f"recipient refused: {exc.recipients}",
                                permanent=all(500 <= c < 600 for c in codes)) from None
        except smtplib.SMTPResponseException as exc:
            # Even 5xx here (bad credentials, sender refused) is our configuration,
            # which someone will fix: keep retrying rather than drop the mail.
            raise DeliveryError(f"SMTP {exc.smtp_code}: {exc.smtp_error!r}") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"cannot reach {cfg.host}:{cfg.port}: {exc}") from None
