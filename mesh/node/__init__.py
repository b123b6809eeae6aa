"""The handler-node SDK: declare actions with a decorator, then `run()` against a broker.

The package is three layers: `api` (what a node's author uses: `Node`, `@node.action`,
`report_progress`), `core` (the sans-IO protocol: registration, each broker's liveness,
the control commands, `CommandDedupe`) and `loop` (sockets, threads and sends).

Rules of this package:

* `run()` drives one DEALER per broker from an asyncio loop on the calling thread, and
  only that loop touches them. A node of a cluster connects to every broker and serves
  each: it registers and heartbeats on every link, and answers a command on the link
  it came in on. Async handlers run on that loop (no thread hop: the fast
  choice for non-blocking work); sync handlers run on a pool of `capacity` threads.
* A payload is validated against its action's schema before the handler sees it; a
  refused payload is answered `validation failed` naming the field.
* A handler that raises is answered `internal` (with the exception type, never its
  message or the payload, which may hold secrets) and the node keeps serving.
* The node registers on start, heartbeats every `heartbeat_interval` whatever the
  broker's state (never faster, so a returning broker is not met by a burst), and
  registers again when the broker says it does not know the node (a restarted broker).
  Each heartbeat carries the node's load: in-flight commands, capacity, work waiting for
  a pool thread, and an exponentially weighted mean of handler time.
* The node watches its broker with the table every role uses (`mesh.link.health`) and
  the broker's own thresholds (`silence_event`): any message from the broker counts,
  silence past 1.5 intervals makes it suspect, past 3 dead; each change is logged.
* A command runs at most once while the node remembers its id (`CommandDedupe`: the
  last `RECENT_COMMANDS` ids, up to `RECENT_COMMAND_S`), whichever broker it comes
  through: a resend of a finished command gets the stored reply with its new envelope,
  and a resend of a running one gets the first copy's reply when it finishes. Only outcomes of commands whose handler started
  are stored; refusals (capacity, bad payload, no such action) are not, so a resend of
  those is judged again. Ids are unique but not secret (`new_id`), so a stored reply is
  given only to a resend of the same action carrying the same token.
* With credentials (security on) the link is CURVE; encrypted commands are decrypted
  before validation, and their replies are encrypted with the same key ring.
* Every command that claims level 3 has its signature checked before validation, with
  the trust store's key of the sender the broker names in a fourth frame (with or
  without credentials: a node that knows no signer refuses every such claim); a
  refused command is answered SIGNATURE_INVALID with `details.reason`, never run.
* A `cancel` from the broker (the caller gave up) cancels an async handler's task, which
  is answered CANCELLED; a sync handler cannot be stopped, so it finishes and the
  broker drops its reply. Handlers report progress with `report_progress()`, which
  finds its command through a context variable.
* `publish()` may be called from any thread (handlers included); the event leaves on the
  first link whose broker is up, in order with the replies on that link. Nobody waits for the broker's
  acknowledgement, so a refusal is logged.
"""

from .api import Node, report_progress
from .core import Action, CommandDedupe, Handler, Seen

__all__ = ["Action", "CommandDedupe", "Handler", "Node", "Seen", "report_progress"]
