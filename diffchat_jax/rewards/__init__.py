"""Reward components and their combination; base.py has the interface. A component registers itself by name when
its module is imported (the PPO trainer imports them all)."""
