"""IV-guided training (Jiang et al., 2024): its config, trainers, the fused KL term and the strength schedules."""
