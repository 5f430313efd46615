"""The Channels tutorial's broadcast chat (no auth, no persistence, no audit), as written there."""
