"""The control plane: REST API, cluster service, scheduler, health, and their wiring."""
