"""Routing asset messages across several clusters: the consistent hash ring
(:mod:`.ring`) and the routers, asyncio and blocking (:mod:`.router`)."""
