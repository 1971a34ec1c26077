"""A pool across hosts: the trust, the control channel, the store, the coordinator and the agent."""
