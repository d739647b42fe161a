"""An SMTP server that keeps what it receives: aiosmtpd on loopback.

    smtp_sink.py PORT [CERT KEY USER PASSWORD]

Without the optional arguments it speaks plain SMTP. With them it offers
STARTTLS with that certificate and requires it, then AUTH with that user
and password. It prints "ready" once listening, then one JSON line per
message received: {"from", "to", "user", "data"}.
"""

import json
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class Keep:
    async def handle_DATA(self, server, session, envelope):
        line = {
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "user": session.auth_data.login.decode() if session.authenticated else None,
            "data": envelope.content.decode("utf-8", "replace"),
        }
        print(json.dumps(line), flush=True)
        return "250 Message accepted"


def main():
    port = int(sys.argv[1])
    options = {}
    if len(sys.argv) == 6:
        cert, key, user, password = sys.argv[2:6]
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)

        def authenticate(server, session, envelope, mechanism, auth_data):
            good = auth_data.login == user.encode() and auth_data.password == password.encode()
            # Not handled: aiosmtpd answers 535 itself on a failure.
            return AuthResult(success=good, handled=False, auth_data=auth_data)

        options = {
            "tls_context": context,
            "require_starttls": True,
            "authenticator": authenticate,
            "auth_required": True,
            "auth_require_tls": True,
        }
    controller = Controller(Keep(), hostname="127.0.0.1", port=port, **options)
    controller.start()
    print("ready", flush=True)
    # Until the test closes stdin (or ends).
    sys.stdin.read()
    controller.stop()


if __name__ == "__main__":
    threading.current_thread().name = "smtp-sink"
    main()
