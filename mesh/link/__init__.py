"""Sans-IO pieces every role (broker, node, client) shares: no zmq, no asyncio, no clock."""
