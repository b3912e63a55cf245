"""`synapse-router` subcommands that check the router against Synapse: routes audit, config from-synapse/check."""
