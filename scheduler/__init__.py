"""The central GPU scheduler: device readings, node agents, placement, routing view and simulator."""
