"""Reference servers the chat is measured against: the Channels tutorial and bare websockets."""
