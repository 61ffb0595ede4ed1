"""The HTTP API (`metering api`): the module's commands and queries over REST, with OpenAPI."""
