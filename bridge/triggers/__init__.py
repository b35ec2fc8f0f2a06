"""Change-triggered messages and custom events (issue 17; docs/triggers.md).

- `config`: the `triggers:` section's models and their checks (impossible combinations are
  config errors naming the key).
- `match`: which triggers an event fires and what each sends (pure: no I/O).
- `output`: the second output beside user updates: sends Create message / Create custom events
  requests exactly once (OneSignal's `idempotency_key`), after the user's earlier changes.
"""
