"""A minimal Django project for tests/test_django.py (Django 6, so Python 3.12+)."""
