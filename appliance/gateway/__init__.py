"""The data plane: an async HTTP server that streams bytes between clients and engines."""

# The supervisor names each gateway it starts; /healthz and /readyz answer with the name, so
# a probe can tell its own child from whatever else holds the port.
INSTANCE_ENV = "APPLIANCE_GATEWAY_INSTANCE"
# Which of the gateway's worker processes this is (0..workers-1): its column in the shared
# limits, its spool file.
WORKER_ENV = "APPLIANCE_GATEWAY_WORKER"
