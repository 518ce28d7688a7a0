"""Webhooks: telling a request's receiver that it started, progressed, produced output or completed.

The step that causes an event writes its deliveries into the service's deliveries stream (store/lua: finish,
take, remove, expire), so a crash cannot lose one; dispatchers (`queue-service webhooks`, started by `up`) send
them, signed the Standard Webhooks way, with retries and dead letters. See docs/webhooks.md.
"""
