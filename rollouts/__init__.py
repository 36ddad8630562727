"""treetune.rollouts"""
