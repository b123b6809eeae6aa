"""Sans-IO pieces every role shares (no zmq, no asyncio, no clock): see each module's rules."""
