"""The HTTP routes, one module per group (disconnect.py is what the non-streaming ones share);
app.py mounts them."""
