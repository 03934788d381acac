// A mixed workload through the gateway at a ramping arrival rate:
// 95 % redirects, 4 % analytics reads (GET /analytics/{code}), 1 % creates
// (POST /shorten), over links it seeds through the API in setup().
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e ADMIN_API_KEY=... k6/mixed.js
// Options (env):
//   RATE      peak requests per second, all kinds together (500). The rate
//             ramps from a tenth of RATE to RATE over the first third of
//             DURATION and holds it for the rest.
//   DURATION  whole run (30s)
//   VUS       pre-allocated VUs (32); MAX_VUS the most k6 may add (4 x VUS)
//   LINKS     links seeded in setup() (200)
//   P99_MS            p99 bound of redirects, ms (50, as k6/redirect.js)
//   P99_ANALYTICS_MS  p99 bound of analytics reads, ms (250)
//   P99_CREATE_MS     p99 bound of creates, ms (200, as k6/shorten.js)
// Fails the run when more than 0.1 % of the requests of any kind fail (or
// fail their check) or a kind's p99 exceeds its bound.
//
// The mix is exact, not sampled: of every 100 consecutive iterations one
// creates (the first), four read analytics (the 2nd, 27th, 52nd, 77th) and
// 95 redirect, so even a 3-second smoke run exercises all three kinds.
//
// Gateway limit: /shorten, /links and /analytics share one limit_req zone of
// 50 r/s per client address (burst 100, infra/nginx/gateway.conf.template),
// and k6 is one client address. Creates plus analytics are 5 % of RATE, so
// RATE up to 900 stays under it (45 r/s at the default 500: 25 r/s); above
// that, 429s are expected and fail the run, since they count as errors.
// Seeding in setup() is a burst of LINKS creates: it waits out the 429s it
// gets (Retry-After) instead of failing.
import http from 'k6/http';
import exec from 'k6/execution';
import { check, fail, sleep } from 'k6';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const KEY = __ENV.ADMIN_API_KEY;
const LINKS = parseInt(__ENV.LINKS || '200', 10);
const RATE = parseInt(__ENV.RATE || '500', 10);
const VUS = parseInt(__ENV.VUS || '32', 10);
const MAX_VUS = parseInt(__ENV.MAX_VUS || String(VUS * 4), 10);
const DURATION = __ENV.DURATION || '30s';

// k6 duration strings ("3s", "1m30s", "500ms", "1h") in milliseconds.
function durationMs(text) {
  const units = { h: 3600000, m: 60000, s: 1000, ms: 1 };
  const parts = text.match(/(\d+(?:\.\d+)?)(ms|h|m|s)/g);
  if (!parts || parts.join('') !== text) throw new Error(`DURATION must look like 30s or 1m30s, got ${text}`);
  return parts.reduce((sum, p) => {
    const [, n, unit] = p.match(/(\d+(?:\.\d+)?)(ms|h|m|s)/);
    return sum + parseFloat(n) * units[unit];
  }, 0);
}

const totalMs = durationMs(DURATION);
const rampMs = Math.max(1, Math.round(totalMs / 3));

export const options = {
  scenarios: {
    mixed: {
      executor: 'ramping-arrival-rate',
      startRate: Math.max(1, Math.round(RATE / 10)),
      timeUnit: '1s',
      preAllocatedVUs: VUS,
      maxVUs: Math.max(VUS, MAX_VUS),
      stages: [
        { target: RATE, duration: `${rampMs}ms` },
        { target: RATE, duration: `${Math.max(1, totalMs - rampMs)}ms` },
      ],
    },
  },
  thresholds: {
    'http_req_failed{kind:redirect}': ['rate<0.001'],
    'http_req_failed{kind:analytics}': ['rate<0.001'],
    'http_req_failed{kind:create}': ['rate<0.001'],
    'checks{kind:redirect}': ['rate>0.999'],
    'checks{kind:analytics}': ['rate>0.999'],
    'checks{kind:create}': ['rate>0.999'],
    'http_req_duration{kind:redirect}': [`p(99)<${__ENV.P99_MS || '50'}`],
    'http_req_duration{kind:analytics}': [`p(99)<${__ENV.P99_ANALYTICS_MS || '250'}`],
    'http_req_duration{kind:create}': [`p(99)<${__ENV.P99_CREATE_MS || '200'}`],
  },
};

const AUTH = { Authorization: `Bearer ${KEY}` };
const JSON_AUTH = { ...AUTH, 'Content-Type': 'application/json' };

export function setup() {
  if (!KEY) fail('set ADMIN_API_KEY');
  const codes = [];
  for (let i = 0; i < LINKS; i++) {
    let res;
    for (let attempt = 0; attempt < 30; attempt++) {
      res = http.post(
        `${BASE}/shorten`,
        JSON.stringify({ url: `https://example.com/k6-mixed/${i}` }),
        {
          headers: JSON_AUTH,
          tags: { kind: 'setup' },
          responseCallback: http.expectedStatuses(201, 429),
        },
      );
      if (res.status !== 429) break;
      sleep(parseFloat(res.headers['Retry-After'] || '1'));
    }
    if (res.status !== 201) fail(`seeding failed: ${res.status} ${res.body}`);
    codes.push({ code: res.json('code'), url: res.json('url') });
  }
  return { codes };
}

function pick(codes) {
  return codes[Math.floor(Math.random() * codes.length)];
}

export default function (data) {
  const slot = exec.scenario.iterationInTest % 100;
  if (slot === 0) {
    const tags = { kind: 'create' };
    const res = http.post(
      `${BASE}/shorten`,
      JSON.stringify({ url: `https://example.com/k6-mixed/new/${exec.vu.idInTest}/${exec.scenario.iterationInTest}` }),
      { headers: JSON_AUTH, tags },
    );
    check(res, { created: (r) => r.status === 201 && typeof r.json('code') === 'string' }, tags);
  } else if (slot % 25 === 1) {
    const tags = { kind: 'analytics' };
    const link = pick(data.codes);
    const res = http.get(`${BASE}/analytics/${link.code}`, { headers: AUTH, tags });
    check(
      res,
      { 'the link\'s report': (r) => r.status === 200 && r.json('code') === link.code && typeof r.json('clicks') === 'number' },
      tags,
    );
  } else {
    const tags = { kind: 'redirect' };
    const link = pick(data.codes);
    const res = http.get(`${BASE}/${link.code}`, { redirects: 0, tags });
    check(res, { 'redirects to the target': (r) => r.status === 302 && r.headers.Location === link.url }, tags);
  }
}
