"""treetune.trainers"""
