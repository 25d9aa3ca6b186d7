"""smspartner-status: keeps an SMS Partner account's delivery reports in a SQL database."""
