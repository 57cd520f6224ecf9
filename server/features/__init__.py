"""Online features: one FeatureView per model version drives serving and materialization."""
