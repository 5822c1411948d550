"""F-Learning, forgetting before learning (Ni et al., ACL 2024): its config and trainer."""
