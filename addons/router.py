"""mitmproxy entry script: `mitmdump --mode reverse:http://MAIN:8008@8080 -s addons/router.py
--set router_config=config/router.yaml`. The logic lives in the synapse_router package."""

from synapse_router.addon import SynapseRouter

addons = [SynapseRouter()]
