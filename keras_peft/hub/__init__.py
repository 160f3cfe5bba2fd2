"""KerasHub knowledge: which sublayer plays which role in each family."""
