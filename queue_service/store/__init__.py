"""The store: the only code that talks to Redis, for the API and the workers alike.

`keys` names every key, `scripts` wraps every Lua script in one typed call, `model` holds the types both
sides share, `connection` builds every client; `queues` is the API's (asyncio) side, `consumer` a worker's.
"""
