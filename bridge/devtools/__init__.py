"""Development tools that ship with the bridge because `simulator` and `demo` are commands: the
OneSignal simulator (a strict model of the API, `simstate.py`, and its HTTP server and endpoints),
the local Postgres cluster the demo and the tests start (`localpg.py`), and the demo itself.
Nothing in the streaming path imports this package."""
