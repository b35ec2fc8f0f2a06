"""onesignal-bridge: keep OneSignal users in step with a database."""

__version__ = "0.1.0"
__all__ = ["__version__"]
