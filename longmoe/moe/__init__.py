"""Mixture of Experts (router, dispatch, grouped experts, slimming): see the MoE issues; nothing public yet."""
