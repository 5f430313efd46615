"""The benchmark of issue 7: the chat beside the Channels tutorial and a bare websockets server."""
