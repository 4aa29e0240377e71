//! Client library: bind a listener and register it with the agent.
