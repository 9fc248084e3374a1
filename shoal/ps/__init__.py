"""Parameter servers: sharded dense and sparse tables, RPC, communicator (arrives with the PS core issue)."""
