"""fleetrun: the launcher of servers and workers, locally and on Ray (arrives with the launcher issue)."""
