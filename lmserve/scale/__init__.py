"""Scaling lmserve out: replicas behind one endpoint and the routing between them."""
