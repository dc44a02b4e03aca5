"""Scale-out across replicas: the routing policy (plain Python, no Ray), used by a Ray Serve request router."""
