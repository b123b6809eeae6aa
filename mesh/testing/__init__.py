"""Public helpers for testing code that uses the mesh (the mesh's own tests use them too).

What each module is for:

* `mesh.testing.processes`: real `mesh broker` / `mesh node` processes on random ports,
  always stopped (`run_broker`, `run_node`, `spawn`, `free_ports`, `alive`).
* `mesh.testing.clock`: `FakeClock`, time that moves only when the test says so, for the
  sans-IO cores.
* `mesh.testing.tls`: `self_signed_certificate`, the PEM files `--tls-cert` / `--tls-key` take.
* `mesh.testing.frames`: a frame factory that feeds a sans-IO `Broker` the frames clients
  and nodes send, and decodes what it returns.
* `mesh.testing.raft`: a small consensus cluster whose ticks, cuts and message moves the
  test decides.
* `mesh.testing.sharedlog`: two broker cores sharing one replicated log, as a cluster's
  brokers do once entries commit.

The names of the first three are re-exported here. The last three are imported by their
module path, so `import mesh.testing` does not load the broker core or the consensus core.
"""

from .clock import FakeClock
from .processes import BrokerProcess, MeshProcess, alive, free_ports, run_broker, run_node, spawn
from .tls import self_signed_certificate

__all__ = ["MeshProcess", "BrokerProcess", "spawn", "run_broker", "run_node", "free_ports", "alive", "FakeClock",
           "self_signed_certificate"]
