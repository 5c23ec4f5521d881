"""Backbone registry: each entry carries where its weights come from and the preprocessing they were trained with."""
