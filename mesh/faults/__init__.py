"""The fault-injection suite: a cluster across network namespaces, recording clients,
seeded nemeses and a history checker (docs/operations.md, "Fault suite")."""
