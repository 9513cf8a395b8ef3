"""Engines turn chat messages into a stream of tokens; see `base.Engine` for the narrow interface."""
