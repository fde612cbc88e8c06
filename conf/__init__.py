"""lmtrain's Hydra configs, one folder per config group; installed as the package lmtrain.conf (see cli.CONFIG_DIR)."""
