"""The router's mitmproxy addons, one job each, composed by SynapseRouter (addon.py) in hook order."""
