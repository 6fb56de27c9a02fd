-- migrate:up
set local lock_timeout = '5s';
set local statement_timeout = '60s';
-- Organisations and their members, and the row-level security helpers every later table uses.

create table public.organisations (
  id uuid primary key default gen_random_uuid(),
  name text not null check (length(name) between 1 and 200),
  owner_id uuid not null references auth.users (id),
  stripe_customer_id text unique,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index organisations_owner_id_idx on public.organisations (owner_id);

create table public.organisation_members (
  organisation_id uuid not null references public.organisations (id) on delete cascade,
  user_id uuid not null references auth.users (id) on delete cascade,
  role text not null check (role in ('owner', 'admin', 'member')),
  created_at timestamptz not null default now(),
  primary key (organisation_id, user_id)
);
create index organisation_members_user_id_idx on public.organisation_members (user_id);

-- RLS helpers. SECURITY DEFINER so a policy on organisation_members can ask about
-- organisation_members without recursing; in a schema PostgREST does not expose, and callable
-- by `authenticated` only (policies run as the querying user).
create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;

create function private.is_org_member(org uuid) returns boolean
language sql stable security definer
set search_path = ''
as $$
  select exists (
    select 1 from public.organisation_members m
    where m.organisation_id = org and m.user_id = (select auth.uid())
  )
$$;

create function private.has_org_role(org uuid, roles text[]) returns boolean
language sql stable security definer
set search_path = ''
as $$
  select exists (
    select 1 from public.organisation_members m
    where m.organisation_id = org and m.user_id = (select auth.uid()) and m.role = any (roles)
  )
$$;

revoke all on function private.is_org_member(uuid), private.has_org_role(uuid, text[])
  from public, anon;
grant execute on function private.is_org_member(uuid), private.has_org_role(uuid, text[])
  to authenticated, service_role;

alter table public.organisations enable row level security;
alter table public.organisation_members enable row level security;

create policy organisations_members_read on public.organisations
  for select to authenticated using ((select private.is_org_member(id)));
create policy organisation_members_members_read on public.organisation_members
  for select to authenticated using ((select private.is_org_member(organisation_id)));

revoke all on table public.organisations, public.organisation_members from anon, authenticated;
grant select on table public.organisations, public.organisation_members to authenticated;
grant all on table public.organisations, public.organisation_members to service_role;

-- migrate:down
