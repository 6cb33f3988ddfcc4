"""The control plane: Ray decides where each model runs; bytes flow over plain HTTP."""

NAMESPACE = "appliance"
REGISTRY_NAME = "replica-registry"
# The hex id of the placement group whose bundles the engine's Ray workers take, set by a
# replica whose stages span nodes in its engine's environment.
PLACEMENT_GROUP_ENV = "APPLIANCE_PLACEMENT_GROUP"
