"""Webhooks per Standard Webhooks: endpoints, signing, address rules, delivery."""
