"""Every benchmark of the mesh, run by one command: `mesh bench` (docs/performance.md).

Each module measures one thing against a floor measured in the same invocation, so
the figures stay comparable on a noisy machine:

* `commands`: commands through the mesh against a raw pyzmq forwarding loop (`mesh bench`).
* `events`: events delivered to subscribers against a raw PUB/SUB chain (`--events`).
* `nats`: NATS in the same shape, beside both, for commands and events (`--peer nats`).
* `security`: commands with each security layer on against security off (`--security`).
* `monitor`: commands with the monitor on and polled against the monitor off (`--monitor`).
* `cluster`: exactly-once commands in a 3-broker cluster against plain ones (`--cluster`).
* `mcp`: tool calls through the MCP bridge against the MCP SDK's floor (`--mcp`); run as
  `python -m mesh.bench.mcp [--http]` it is that floor server.
* `failover`: how fast a lost node is noticed and its calls recovered, under load (`--failover`).
* `scale`: what many connected idle clients cost one broker (`--scale`).
* `common`: what they share: settings, the mesh's processes, the runner and the figures.

Nothing is imported here, so running one benchmark loads only its own module.
"""
