from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"

    def ready(self) -> None:
        from django.core.checks import Tags, register

        from chat import checks

        for check in checks.CHECKS:
            register(check, Tags.security)
        for check in checks.DEPLOY_CHECKS:
            register(check, Tags.security, deploy=True)
