"""treetune.rewards"""
