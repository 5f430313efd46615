"""Enrol a staff user's authenticator app (TOTP) and print backup codes."""

import qrcode
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice


class Command(BaseCommand):
    help = (
        "Create a TOTP device for a user and print its otpauth:// URI as a QR code to scan with "
        "an authenticator app, plus one-time backup codes, for the admin and for staff powers "
        "in the chat (the API sign-in's otp_token). Replaces the user's devices with "
        "--replace."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--name", default="authenticator", help="device name")
        parser.add_argument("--backup-codes", type=int, default=5, help="0 for none")
        parser.add_argument("--replace", action="store_true", help="delete existing devices first")
        parser.add_argument("--no-qr", action="store_true", help="print the URI only")

    def handle(self, *args, **options):
        user = get_user_model().objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user named {options['username']!r}")
        if not (user.is_staff or user.is_superuser):
            raise CommandError("only staff sign in to the admin; this user is not staff")
        if not 0 <= options["backup_codes"] <= 20:
            raise CommandError("--backup-codes must be between 0 and 20")
        limit = TOTPDevice._meta.get_field("name").max_length
        if not 1 <= len(options["name"].strip()) <= limit:
            raise CommandError(f"--name must be 1 to {limit} characters")
        with transaction.atomic():
            if options["replace"]:
                TOTPDevice.objects.filter(user=user).delete()
                StaticDevice.objects.filter(user=user).delete()
            elif TOTPDevice.objects.filter(user=user, confirmed=True).exists():
                raise CommandError("this user already has an authenticator; use --replace")
            device = TOTPDevice.objects.create(user=user, name=options["name"], confirmed=True)
            codes = []
            if options["backup_codes"]:
                static, _ = StaticDevice.objects.get_or_create(user=user, name="backup codes")
                static.token_set.all().delete()
                for _ in range(options["backup_codes"]):
                    token = StaticToken.random_token()
                    static.token_set.create(token=token)
                    codes.append(token)
        uri = device.config_url
        self.stdout.write(f"Scan this with an authenticator app (or enter the URI by hand):\n{uri}")
        if not options["no_qr"]:
            qr = qrcode.QRCode(border=1)
            qr.add_data(uri)
            qr.print_ascii(out=self.stdout, invert=True)
        if codes:
            self.stdout.write("One-time backup codes (store them offline):")
            for code in codes:
                self.stdout.write(f"  {code}")
